"""Crash-safe resume state: manifests, keep-last-N, and falling back past a damaged state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinylm import config as configlib
from tinylm.errors import UserError
from tinylm.stages import pretrain
from tinylm.stages.pretrain import PretrainConfig
from tinylm.train import checkpoint
from tinylm.train.loop import TrainConfig

TINY = [
    "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.block_size=32",
    "train.batch_size=4", "train.warmup_steps=2", "train.progress=false", "train.log_every=1",
    "train.dtype='float32'", "train.steps=8", "train.save_every=2", "model.dropout=0.1",
]


def cfg(corpus: Path, out: Path, *extra: str) -> PretrainConfig:
    return configlib.load(PretrainConfig, None, [f"out='{out}'", f"data.corpus='{corpus}'",
                                                 *TINY, *extra])


def flip_a_byte_near_the_end(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


@pytest.mark.parametrize("damage, file", [(flip_a_byte_near_the_end, "model.safetensors"),
                                          (truncate, "optimizer.safetensors")])
def test_a_damaged_latest_state_is_reported_and_the_previous_one_used(
        tiny_corpus, tmp_path, capsys, damage, file):
    pretrain.run(cfg(tiny_corpus, tmp_path / "full"))
    pretrain.run(cfg(tiny_corpus, tmp_path / "half", "train.stop_after=6"))
    states = sorted((tmp_path / "half" / "state").glob("step-*"))
    assert [s.name for s in states] == ["step-00000004", "step-00000006"]  # the last 2 kept
    damage(states[-1] / file)
    capsys.readouterr()

    pretrain.run(cfg(tiny_corpus, tmp_path / "half"), resume=True)

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-00000006 is damaged" in err[0]
    assert "resuming from step-00000004" in err[0]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "half")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_state_damaged_is_a_one_line_error(tiny_corpus, tmp_path):
    pretrain.run(cfg(tiny_corpus, tmp_path / "run", "train.stop_after=4"))
    for state in (tmp_path / "run" / "state").glob("step-*"):
        truncate(state / "model.safetensors")
    with pytest.raises(UserError, match="every saved state .* is damaged; drop --resume"):
        pretrain.run(cfg(tiny_corpus, tmp_path / "run"), resume=True)


def test_a_state_holds_a_manifest_of_its_files(tiny_corpus, tmp_path):
    pretrain.run(cfg(tiny_corpus, tmp_path / "run", "train.keep_states=3"))
    states = sorted((tmp_path / "run" / "state").glob("step-*"))
    assert [s.name[-1] for s in states] == ["4", "6", "8"]
    loop = json.loads((states[-1] / "loop.json").read_text())
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert loop["manifest"][name]["size"] == (states[-1] / name).stat().st_size
        assert len(loop["manifest"][name]["sha256"]) == 64
    assert not list((tmp_path / "run" / "state").glob(".*"))  # no temporary folders left
    assert checkpoint.check_state(states[-1]) == (loop, "")


def test_keep_states_must_be_positive():
    with pytest.raises(ValueError, match="keep_states"):
        TrainConfig(keep_states=0)
