"""The three encoder-decoders on one translation task, in one table.

    tinylm experiment translation      # trains the three seq2seq presets into runs/translation/

Each preset trains (or, if its run dir already holds `translation.json`, is read back) and its
held-out BLEU / chrF, greedy and beam, go into one Markdown table, printed and written to
`translation.md`. `overrides` apply to every preset, e.g.
`--set 'overrides=["train.steps=300"]'`.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinylm.files import atomic_write_text
from tinylm.stages import seq2seq
from tinylm.stages.common import load_stage_config
from tinylm.stages.seq2seq import Seq2SeqConfig

PRESETS = ["seq2seq-rnn", "seq2seq-rnn-attn", "seq2seq-transformer"]


@dataclass
class TranslationTableConfig:
    out: str = "runs/translation"
    presets: list[str] = field(default_factory=lambda: list(PRESETS))
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE for every preset


def describe(scores: dict[str, Any]) -> str:
    if scores["family"] == "transformer":
        return "Transformer"
    return "RNN + attention" if scores.get("attention") else "RNN, context vector"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | params | train min | val loss | greedy BLEU | greedy chrF | "
            "beam BLEU | beam chrF | beam exact |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        beam = r.get("beam", r["greedy"])
        val = f"{r['val_loss']:.3f}" if r.get("val_loss") is not None else "-"
        lines.append(
            f"| {describe(r)} | {r['params'] / 1e6:.2f}M | {r['train_minutes']:.1f} | {val} | "
            f"{r['greedy']['bleu']:.1f} | {r['greedy']['chrf']:.1f} | {beam['bleu']:.1f} | "
            f"{beam['chrf']:.1f} | {beam['exact']:.0%} |")
    return "\n".join(lines)


def run_translation_table(cfg: TranslationTableConfig, quiet: bool = False) -> dict[str, Any]:
    say = (lambda *a: None) if quiet else print
    out = Path(cfg.out)
    rows = []
    for preset in cfg.presets:
        run_dir = out / Path(preset).stem
        result_path = run_dir / "translation.json"
        if result_path.is_file():
            say(f"{preset}: reusing {result_path}")
        else:
            say(f"--- {preset} -> {run_dir}")
            scfg = load_stage_config(Seq2SeqConfig, preset, cfg.overrides, str(run_dir), False)
            with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
                seq2seq.run(scfg)
        rows.append(json.loads(result_path.read_text()))
    table = format_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "translation.md", table + "\n")
    say(table)
    return {"rows": rows, "table": table}
