"""The one way tinylm writes a file: to a temporary name beside it, flushed to disk, then
renamed over the old one. A crash at any moment leaves either the old file or the new one,
never half of either; fsyncing the file before the rename (and the folder after it) is what
makes that hold across a power cut, not only across a killed process."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def tmp_path(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this process."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make the names in `folder` (a rename into it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = tmp_path(path)
    tmp.write_text(text, encoding="utf-8")
    _publish(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = tmp_path(path)
    tmp.write_bytes(data)
    _publish(tmp, path)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = Path(path)
    tmp = tmp_path(path)
    # clone: tied weights share storage, which safetensors refuses to write twice
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, str(tmp))
    _publish(tmp, path)


def manifest_entry(path: Path) -> dict[str, int | str]:
    """{'size', 'sha256'} of a file, what a later load checks it against."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"size": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def check_entry(path: Path, entry: dict) -> str | None:
    """Why `path` does not match its manifest entry, or None when it does."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{path.name} is {size} bytes, {entry['size']} were written (truncated?)"
    if manifest_entry(path)["sha256"] != entry["sha256"]:
        return f"{path.name} does not match its sha256 (corrupted)"
    return None
