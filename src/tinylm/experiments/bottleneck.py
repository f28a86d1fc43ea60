"""The context-vector bottleneck: how well do encoder-decoders copy long sequences?

    tinylm experiment bottleneck            # three models, a table, runs/bottleneck/bottleneck.png

A synthetic, length-controlled task: the source is a random string of `symbols` whose length
is drawn uniformly from [min_len, max_len]; the target is the same string (`task = "copy"`)
or its reverse (`"reverse"`). Three encoder-decoders train on it with the same budget:

- `rnn`: GRU encoder -> one fixed context vector -> GRU decoder (Cho et al. 2014);
- `rnn-attn`: the same, plus additive attention over all encoder outputs (Bahdanau 2015);
- `transformer`: the Transformer encoder-decoder (Vaswani et al. 2017).

Then each copies fresh strings of every length (greedy decoding) and we plot the exact-match
accuracy against the input length. A random string of n symbols out of 10 holds n * log2(10)
= 3.3 n bits; the RNN without attention must carry all of them in its d_model numbers, so
it falls off as n grows, while the attention models read each symbol back from the source
when they need it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinylm import config as configlib
from tinylm.data.pairs import PairData
from tinylm.errors import UserError
from tinylm.files import atomic_write_text
from tinylm.infer.beam import greedy_search
from tinylm.models.rnn import RNNConfig, RNNEncoderDecoder
from tinylm.models.transformer import Transformer, TransformerConfig
from tinylm.stages.common import batch_generator, prepare_run_dir
from tinylm.tokenizer import Tokenizer, train_char
from tinylm.train import objectives
from tinylm.train.loop import TrainConfig, train

ARCHS = ("rnn", "rnn-attn", "transformer")
LABELS = {"rnn": "RNN, context vector only", "rnn-attn": "RNN + additive attention",
          "transformer": "Transformer"}


def _transformer_default() -> TransformerConfig:
    return TransformerConfig(n_layer=2, n_head=4, d_model=64, dropout=0.0)


def _rnn_default() -> RNNConfig:
    return RNNConfig(d_model=128, dropout=0.0)


def _train_default() -> TrainConfig:
    return TrainConfig(steps=1000, batch_size=64, optimizer="adamw", lr=3e-3, warmup_steps=50,
                       schedule="cosine", min_lr_factor=0.05, log_every=50)


@dataclass
class BottleneckConfig:
    out: str = "runs/bottleneck"
    task: str = "copy"  # copy | reverse
    symbols: str = "abcdefghij"  # the alphabet of the random strings
    min_len: int = 2
    max_len: int = 20
    eval_per_length: int = 40  # fresh test strings per length
    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    transformer: TransformerConfig = field(default_factory=_transformer_default)
    rnn: RNNConfig = field(default_factory=_rnn_default)  # shared by rnn and rnn-attn
    train: TrainConfig = field(default_factory=_train_default)

    def __post_init__(self):
        if self.task not in ("copy", "reverse"):
            raise ValueError(f"task={self.task!r} is not one of copy, reverse")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError("need 1 <= min_len <= max_len")
        if len(set(self.symbols)) < 2:
            raise ValueError("symbols needs at least two different characters")
        unknown = [a for a in self.archs if a not in ARCHS]
        if unknown or not self.archs:
            raise ValueError(f"archs: {unknown or 'none'} not among {', '.join(ARCHS)}")


class CopyTask:
    """Random strings and their targets, as token ids of a character tokenizer."""

    def __init__(self, cfg: BottleneckConfig, tok: Tokenizer):
        self.cfg, self.tok = cfg, tok
        self.symbol_ids = torch.tensor([tok.encode(s)[0] for s in sorted(set(cfg.symbols))])

    def pairs(self, lengths: list[int], gen: torch.Generator) -> PairData:
        src, tgt = [], []
        for n in lengths:
            pick = torch.randint(len(self.symbol_ids), (n,), generator=gen)
            ids = self.symbol_ids[pick].tolist()
            out = ids if self.cfg.task == "copy" else ids[::-1]
            src.append(ids + [self.tok.eos_id])
            tgt.append([self.tok.bos_id] + out + [self.tok.eos_id])
        return PairData(src, tgt, self.tok.pad_id)

    def batch(self, B: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        c = self.cfg
        lengths = torch.randint(c.min_len, c.max_len + 1, (B,), generator=gen).tolist()
        return self.pairs(lengths, gen).collate(range(B))


def build(arch: str, cfg: BottleneckConfig, vocab_size: int, pad_id: int):
    """A fresh model of one of the three architectures, sized by the experiment config."""
    if arch == "transformer":
        mcfg = TransformerConfig(**{**configlib.to_dict(cfg.transformer),
                                    "vocab_size": vocab_size, "pad_id": pad_id,
                                    "block_size": cfg.max_len + 2})
        return Transformer(mcfg)
    mcfg = RNNConfig(**{**configlib.to_dict(cfg.rnn), "vocab_size": vocab_size,
                        "pad_id": pad_id, "block_size": cfg.max_len + 2,
                        "attention": arch == "rnn-attn"})
    return RNNEncoderDecoder(mcfg)


@torch.no_grad()
def accuracy_by_length(model, task: CopyTask, seed: int) -> dict[int, float]:
    """Exact-match accuracy of greedy decoding on fresh strings, per source length."""
    c, tok = task.cfg, task.tok
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for n in range(c.min_len, c.max_len + 1):
        gen = torch.Generator().manual_seed(10_000_019 * (seed + 1) + n)  # unseen strings
        data = task.pairs([n] * c.eval_per_length, gen)
        src, _, tgt_out = data.collate(range(len(data)))
        hyps = greedy_search(model, src.to(device), tok.bos_id, tok.eos_id, n + 2)
        refs = [row[row != -100].tolist()[:-1] for row in tgt_out]  # drop the EOS
        out[n] = sum(h == r for h, r in zip(hyps, refs)) / len(refs)
    return out


def buckets(acc: dict[int, float], width: int = 4) -> list[tuple[str, float]]:
    """Mean accuracy over length ranges of `width`, for the printed table."""
    lengths = sorted(acc)
    rows = []
    for i in range(0, len(lengths), width):
        chunk = lengths[i : i + width]
        label = f"{chunk[0]}-{chunk[-1]}" if len(chunk) > 1 else str(chunk[0])
        rows.append((label, sum(acc[n] for n in chunk) / len(chunk)))
    return rows


def format_table(results: dict[str, dict[str, Any]]) -> str:
    archs = list(results)
    table = {a: buckets({int(k): v for k, v in results[a]["accuracy"].items()}) for a in archs}
    head = f"{'length':>8} " + " ".join(f"{a:>12}" for a in archs)
    lines = [head, "-" * len(head)]
    for i, (label, _) in enumerate(table[archs[0]]):
        lines.append(f"{label:>8} " + " ".join(f"{table[a][i][1]:>12.0%}" for a in archs))
    lines.append(f"{'params':>8} " + " ".join(f"{results[a]['params']:>12,}" for a in archs))
    lines.append(f"{'minutes':>8} " + " ".join(f"{results[a]['train_minutes']:>12.2f}"
                                              for a in archs))
    return "\n".join(lines)


def plot_accuracy_by_length(curves: dict[str, dict[int, float]], title: str,
                            out: Path) -> Path:
    """One line per model: exact-match accuracy (y) against input length (x)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = [("o", "-", 5), ("s", "--", 7), ("d", ":", 5), ("^", "-.", 5)]
    for (label, acc), (marker, line, size) in zip(curves.items(), styles):
        xs = sorted(acc)  # distinct dashes and marker sizes: equal curves stay visible
        ax.plot(xs, [acc[n] for n in xs], marker=marker, ls=line, ms=size, lw=1.5,
                mfc="none" if size > 5 else None, label=label)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("input length (symbols)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def run_bottleneck(cfg: BottleneckConfig, quiet: bool = False) -> dict[str, Any]:
    """Train every architecture in cfg.archs, measure accuracy by length, plot, tabulate."""
    say = (lambda *a: None) if quiet else print
    out = Path(cfg.out)
    for arch in cfg.archs:  # fail before any training if a run would be overwritten
        if (out / arch / "model.safetensors").exists():
            raise UserError(f"{out / arch} already holds a model; pass --out to write the "
                            "experiment elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    configlib.save(cfg, out / "config.toml")
    tok = train_char(cfg.symbols)
    task = CopyTask(cfg, tok)
    results: dict[str, dict[str, Any]] = {}
    for arch in cfg.archs:
        run_dir = prepare_run_dir(out / arch, resume=False)
        tok.save(run_dir / "tokenizer.json")
        torch.manual_seed(cfg.train.seed)
        model = build(arch, cfg, tok.vocab_size, tok.pad_id)
        say(f"{arch}: {model.num_params():,} parameters, training {cfg.train.steps} steps")

        def batch_fn(step: int, k: int):
            return task.batch(cfg.train.batch_size, batch_generator(cfg.train.seed, step, k))

        t0 = time.perf_counter()
        res = train(model, objectives.seq2seq, batch_fn, cfg.train, run_dir)
        acc = accuracy_by_length(model, task, cfg.train.seed)
        results[arch] = {"params": model.num_params(), "loss": res.get("loss"),
                         "train_minutes": round(res["train_time"] / 60, 2),
                         "wall_minutes": round((time.perf_counter() - t0) / 60, 2),
                         "accuracy": {str(n): a for n, a in acc.items()}}
        say(f"{arch}: loss {res.get('loss', float('nan')):.4f}, mean exact match "
            f"{sum(acc.values()) / len(acc):.0%}")
    atomic_write_text(out / "bottleneck.json", json.dumps(results, indent=2))
    png = plot_accuracy_by_length(
        {LABELS[a]: {int(k): v for k, v in r["accuracy"].items()} for a, r in results.items()},
        f"{cfg.task} task, {len(set(cfg.symbols))} symbols: exact match by input length",
        out / "bottleneck.png")
    table = format_table(results)
    say(table)
    say(f"wrote {png} and {out / 'bottleneck.json'}")
    return {"results": results, "table": table, "png": png}
