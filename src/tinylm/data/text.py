"""Where text comes from: a shipped corpus by name, or the user's own files.

A source is one of
- a shipped corpus name: `tinyshakespeare`, `tinystories` (both TinyStories files),
  `tinystories_sample`, `tinystories_train_head`;
- a UTF-8 `.txt` file, a `.jsonl` file whose lines are objects with a `text` field,
- or a folder holding such files (read in sorted order).
Documents are joined with a blank line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tinylm.errors import UserError

CORPUS_DIR = Path(__file__).parent / "corpora"
CORPORA = {
    "tinyshakespeare": ["tinyshakespeare.txt"],
    "tinystories": ["tinystories_sample.txt", "tinystories_train_head.txt"],
    "tinystories_sample": ["tinystories_sample.txt"],
    "tinystories_train_head": ["tinystories_train_head.txt"],
}


def resolve(source: str) -> list[Path]:
    """The files behind a source name or path."""
    if source in CORPORA:
        return [CORPUS_DIR / f for f in CORPORA[source]]
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise UserError(f"{path}: folder holds no .txt or .jsonl files")
        return files
    if path.is_file():
        return [path]
    names = ", ".join(CORPORA)
    raise UserError(f"corpus {source!r} not found; give a file, a folder, or one of: {names}")


def read_file(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not UTF-8 text (byte {e.start}); convert it, e.g. iconv -t utf-8"
        ) from None
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            texts.append(obj["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
        if not isinstance(texts[-1], str):
            raise UserError(f"{path}:{n}: the 'text' field must be a string")
    return "\n\n".join(texts)


def load_text(source: str) -> str:
    files = resolve(source)
    text = "\n\n".join(read_file(f) for f in files)
    if not text.strip():
        raise UserError(f"corpus {source!r} is empty; give a file with some text in it")
    return text


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
