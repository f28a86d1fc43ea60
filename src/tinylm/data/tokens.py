"""Token ids for language-model training: tokenized once, cached, served as random windows.

The cache is a flat memmapped array keyed by (corpus fingerprint, tokenizer fingerprint), so
the second run on the same text starts at once. The split is deterministic: the last
`val_fraction` of the token stream is validation (as nanoGPT does, so numbers compare).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinylm.data.text import fingerprint
from tinylm.errors import UserError
from tinylm.files import atomic_write_bytes, atomic_write_text
from tinylm.tokenizer import Tokenizer


@dataclass
class DataConfig:
    """Where a token stream comes from and how it is split (pre-training, masked LM)."""

    corpus: str = "tinyshakespeare"  # shipped corpus name, a file, or a folder
    tokenizer: str = "char"  # char | bpe
    vocab_size: int = 4096  # bpe only
    val_fraction: float = 0.1  # the last 10% of tokens
    eval_batch_size: int = 32
    eval_tokens: int = 0  # cap on validation tokens per eval; 0 = the whole split


def cache_dir() -> Path:
    root = os.environ.get("TINYLM_CACHE") or Path.home() / ".cache" / "tinylm"
    return Path(root) / "tokens"


def encode_cached(text: str, tok: Tokenizer) -> np.ndarray:
    """All token ids of `text`, from the cache when this text/tokenizer pair was seen before."""
    key = f"{fingerprint(text)}-{tok.fingerprint()}"
    path = cache_dir() / f"{key}.bin"
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    if path.is_file() and path.stat().st_size % np.dtype(dtype).itemsize == 0:
        return np.memmap(path, dtype=dtype, mode="r")
    # Encode paragraph by paragraph (in parallel inside `tokenizers`); lossless either way.
    pieces = text.split("\n\n")
    pieces = [p + "\n\n" for p in pieces[:-1]] + pieces[-1:]
    ids = np.fromiter(
        (i for row in tok.encode_batch(pieces) for i in row), dtype=dtype, count=-1
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, ids.tobytes())
    atomic_write_text(path.with_suffix(".json"), json.dumps({"tokens": int(ids.size)}))
    return ids


class TokenData:
    """Train/val token streams with random training windows and a full validation pass."""

    def __init__(self, ids: np.ndarray, val_fraction: float = 0.1):
        n_val = int(len(ids) * val_fraction)
        self.train = ids[: len(ids) - n_val]
        self.val = ids[len(ids) - n_val :]

    def check_block(self, block_size: int) -> None:
        for name, part in (("train", self.train), ("val", self.val)):
            if len(part) <= block_size + 1:
                raise UserError(
                    f"the {name} split has {len(part)} tokens, fewer than block_size+2="
                    f"{block_size + 2}; use more text or a smaller model.block_size"
                )

    def batch(self, B: int, T: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """B random windows of T+1 tokens from the train split: inputs and next-token targets."""
        starts = torch.randint(len(self.train) - T - 1, (B,), generator=gen).numpy()
        rows = self.train[starts[:, None] + np.arange(T + 1)].astype(np.int64)  # (B, T+1)
        xy = torch.from_numpy(rows)
        return xy[:, :-1], xy[:, 1:]

    def val_batches(self, B: int, T: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every val token once, in non-overlapping windows of T (last partial window dropped)."""
        n = (len(self.val) - 1) // T
        for i in range(0, n, B):
            starts = np.arange(i, min(i + B, n)) * T
            rows = self.val[starts[:, None] + np.arange(T + 1)].astype(np.int64)
            xy = torch.from_numpy(rows)
            yield xy[:, :-1], xy[:, 1:]
