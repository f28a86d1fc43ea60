"""tinylm: a complete, hands-on language-model stack on PyTorch.

    model, tok = tinylm.load("runs/shakespeare-char")
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load(run_dir: str | Path, device: str = "cpu", family: str | tuple[str, ...] | None = None):
    """The model and tokenizer of any run dir, ready for inference (eval mode); `family`
    ("gpt", ("transformer", "rnn"), ...) makes a run of another kind a UserError."""
    from tinylm.tokenizer import Tokenizer
    from tinylm.train.checkpoint import load_model

    model = load_model(Path(run_dir), family=family, device=device).eval()
    return model, Tokenizer.load(Path(run_dir) / "tokenizer.json")
