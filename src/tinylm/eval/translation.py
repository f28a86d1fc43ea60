"""Translation quality: corpus BLEU and chrF from `sacrebleu`, with several references each.

BLEU (Papineni et al. 2002) is the geometric mean of 1- to 4-gram precisions times a brevity
penalty, on sacrebleu's standard "13a" tokenisation; chrF (Popovic 2015) is an F-score over
character n-grams (up to 6), kinder to short sentences and to French morphology. Both are in
0-100. A source may have any number of references: sacrebleu takes them as parallel
"reference streams", and a source with fewer references gets `None` in the streams it lacks.
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu


def reference_streams(refs: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-source reference lists -> sacrebleu's streams (stream k holds each k-th reference)."""
    width = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def score(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """{'bleu', 'chrf'} of hypotheses against one or more references per hypothesis."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lists")
    streams = reference_streams(refs)
    bleu = sacrebleu.corpus_bleu(list(hyps), streams)
    chrf = sacrebleu.corpus_chrf(list(hyps), streams)
    return {"bleu": round(bleu.score, 2), "chrf": round(chrf.score, 2)}


def exact_match(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Fraction of hypotheses equal to one of their references."""
    return sum(h in r for h, r in zip(hyps, refs)) / max(len(hyps), 1)
