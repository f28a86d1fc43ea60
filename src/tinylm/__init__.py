"""tinylm: a complete, hands-on language-model stack on PyTorch.

    model, tok = tinylm.load("runs/shakespeare-char")
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load(run_dir: str | Path, device: str = "cpu", family: str | tuple[str, ...] | None = None):
    """The model and tokenizer of any run dir, ready for inference (eval mode); `family`
    ("gpt", ("transformer", "rnn"), ...) makes a run of another kind a UserError. For an
    encoder-decoder the tokenizer is the source side's; tinylm.rundir.load_seq2seq gives both."""
    from tinylm import rundir

    return rundir.load(run_dir, device, family)
