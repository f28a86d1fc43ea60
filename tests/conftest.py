"""Shared fixtures: tiny corpora, tiny configs, an isolated token cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tiny models run fastest on one thread, and a second thread only spins against whatever else
# the machine is doing.
torch.set_num_threads(1)

TINY_TEXT = (
    "The sun is shining and the birds are singing. The cat sat on the mat. "
    "A dog is chasing the ball in the park. The birds are flying over the trees.\n\n"
) * 40


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches go to a temp dir, so tests never touch ~/.cache and never share state."""
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only adds waiting. A
    test that changes the thread count (train.threads) gets it put back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def error_of():
    """error_of(argv, capsys): run the CLI, expect exit 2 and a one-line error, return it."""
    from tinylm.cli import main

    def run(args: list[str], capsys) -> str:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("tinylm: error:") and "Traceback" not in err
        assert err.count("\n") == 1
        return err

    return run


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def tiny_overrides() -> list[str]:
    """--set overrides that make any GPT preset train in a second."""
    return list(TINY_OVERRIDES)


TINY_OVERRIDES = [
    "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.block_size=32",
    "train.steps=6", "train.batch_size=4", "train.warmup_steps=2", "train.progress=false",
    "train.log_every=1", "train.dtype='float32'",
]
