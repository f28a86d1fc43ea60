"""Pictures: loss curves and next-token probability bars (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(run_dir: Path, out: Path | None = None) -> Path | None:
    """loss.png: training loss per step, and validation metrics where they were measured."""
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    val_keys = sorted({k for r in rows for k in r if k.startswith("val_")} - {"val_ppl"})
    for key in val_keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), "o-", label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out or Path(run_dir) / "loss.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_next_tokens(prompt: str, rows: list[tuple[str, float]], out: Path) -> Path:
    """Horizontal bar chart of the most likely next tokens."""
    tokens = [repr(t)[1:-1] for t, _ in rows][::-1]
    probs = [p for _, p in rows][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ax.barh(tokens, probs, color="#4c72b0")
    for i, p in enumerate(probs):
        ax.text(p, i, f" {p:.1%}", va="center", fontsize=8)
    ax.set_xlabel("probability")
    ax.set_xlim(0, min(1.0, max(probs) * 1.25))
    ax.set_title(f"next token after: {prompt[-60:]!r}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
