"""Sentence pairs for sequence-to-sequence training: read a TSV, split it, batch it.

A pairs file is UTF-8 text with one pair per line: source, a tab, target; further columns
(the shipped eng-fra.tsv keeps its Tatoeba attribution in a third one) are ignored. Blank
lines are skipped. A line without a tab or with an empty source or target is malformed: it
stops the run with its line number (`on_error = "stop"`), or is skipped and counted
(`on_error = "skip"`).

The held-out split is made over distinct *source sentences*, not lines: Tatoeba gives many
sources several translations ("Go." -> "Va !", "Marche.", "Bouge !"), and a split by line
would put one of them in training and test on another. All translations of a held-out
source become its references, so BLEU and chrF are multi-reference scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tinylm.data.split import held_out
from tinylm.data.text import CORPUS_DIR
from tinylm.errors import UserError
from tinylm.tokenizer import Tokenizer

SHIPPED = {"eng-fra": CORPUS_DIR / "eng-fra.tsv"}


@dataclass(frozen=True)
class Pair:
    src: str
    tgt: str
    line: int  # 1-based line number in the file, for messages


@dataclass
class PairsFile:
    pairs: list[Pair]
    skipped: list[str]  # "path:line: reason" for each malformed line skipped


def resolve(source: str) -> Path:
    if source in SHIPPED:
        return SHIPPED[source]
    path = Path(source).expanduser()
    if path.is_file():
        return path
    raise UserError(f"pairs file {source!r} not found; give a TSV file or one of: "
                    f"{', '.join(SHIPPED)}")


def read_pairs(source: str, on_error: str = "stop") -> PairsFile:
    """Every (source, target) pair of a TSV file; malformed lines stop or are skipped."""
    if on_error not in ("stop", "skip"):
        raise UserError(f"data.on_error={on_error!r} must be 'stop' or 'skip'")
    path = resolve(source)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); convert it, e.g. "
                        "iconv -t utf-8") from None
    pairs, skipped = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        problem = _check_line(line)
        if problem is None:
            cols = line.split("\t")
            pairs.append(Pair(cols[0].strip(), cols[1].strip(), n))
        elif on_error == "skip":
            skipped.append(f"{path}:{n}: {problem}")
        else:
            raise UserError(f"{path}:{n}: {problem}; fix the line or set "
                            "data.on_error=\"skip\"")
    if not pairs:
        raise UserError(f"{path}: no valid source<TAB>target lines; give a TSV of pairs")
    return PairsFile(pairs, skipped)


def _check_line(line: str) -> str | None:
    cols = line.split("\t")
    if len(cols) < 2:
        return "no tab (expected source<TAB>target)"
    if not cols[0].strip():
        return "empty source"
    if not cols[1].strip():
        return "empty target"
    return None


def split_pairs(pairs: Sequence[Pair], val_fraction: float,
                seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): a seeded shuffle of the distinct sources, the last `val_fraction`
    of them held out with every one of their translations. Deterministic for a seed."""
    held = held_out(sorted({p.src for p in pairs}), val_fraction, seed, "distinct sources")
    return [p for p in pairs if p.src not in held], [p for p in pairs if p.src in held]


def references(pairs: Sequence[Pair]) -> tuple[list[str], list[list[str]]]:
    """Distinct sources (in first-seen order) and all targets given for each."""
    refs: dict[str, list[str]] = {}
    for p in pairs:
        refs.setdefault(p.src, []).append(p.tgt)
    return list(refs), list(refs.values())


def encode_source(tok: Tokenizer, text: str) -> list[int]:
    """Source ids end with EOS, which marks the end for the encoder (and is never empty)."""
    if not text.strip():
        raise UserError("the source sentence is empty; give some text to translate")
    return tok.encode(text) + [tok.eos_id]


def encode_target(tok: Tokenizer, text: str) -> list[int]:
    """Target ids framed for teacher forcing: BOS + target + EOS (split into in and out)."""
    return [tok.bos_id] + tok.encode(text) + [tok.eos_id]


def pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad id lists into a (B, max_len) long tensor."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class PairData:
    """Encoded pairs served as padded (src, tgt_in, tgt_out) batches for `model(*batch)`."""

    def __init__(self, src: list[list[int]], tgt: list[list[int]], pad_id: int):
        self.src, self.tgt, self.pad_id = src, tgt, pad_id

    def __len__(self) -> int:
        return len(self.src)

    def collate(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = pad([self.src[i] for i in idx], self.pad_id)  # (B, S)
        tgt_in = pad([self.tgt[i][:-1] for i in idx], self.pad_id)  # (B, T): BOS + target
        tgt_out = pad([self.tgt[i][1:] for i in idx], -100)  # (B, T): target + EOS
        return src, tgt_in, tgt_out

    def batch(self, B: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """B pairs drawn at random (with replacement) from `gen`."""
        return self.collate(torch.randint(len(self), (B,), generator=gen).tolist())

    def batches(self, B: int):
        """Every pair once, in order, B at a time (for evaluation)."""
        for i in range(0, len(self), B):
            yield self.collate(range(i, min(i + B, len(self))))
