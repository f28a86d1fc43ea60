"""Sequence-to-sequence training on sentence pairs (Transformer or RNN encoder-decoder).

    tinylm seq2seq --config seq2seq-transformer      # or seq2seq-rnn, seq2seq-rnn-attn
    tinylm translate --run runs/seq2seq-transformer "I am cold."

Teacher forcing: the decoder reads BOS + the reference target and is trained to predict
target + EOS at every position at once (the loop's `model(src, tgt_in, tgt_out)`). After
training, the held-out sources are translated (greedy and beam search) and scored with BLEU and
chrF against all their references; the numbers go to `translation.json` in the run dir.

Vocabulary: one tokenizer trained on both sides by default (`tokenizer.json`); with
`data.shared_vocab = false` the source keeps `tokenizer.json` and the target gets its own
`tokenizer-target.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinylm import config as configlib
from tinylm import viz
from tinylm.data.pairs import (
    Pair,
    PairData,
    encode_source,
    encode_target,
    read_pairs,
    references,
    split_pairs,
)
from tinylm.errors import UserError
from tinylm.eval.translation import exact_match, score
from tinylm.files import atomic_write_text
from tinylm.infer.beam import translate
from tinylm.models import SEQ2SEQ_FAMILIES
from tinylm.models.rnn import RNNConfig, RNNEncoderDecoder
from tinylm.models.transformer import Transformer, TransformerConfig
from tinylm.rundir import load_model, load_seq2seq, save_tokenizers
from tinylm.stages.common import batch_generator, prepare_run_dir
from tinylm.tokenizer import Tokenizer
from tinylm.tokenizer import train as train_tokenizer
from tinylm.train import objectives
from tinylm.train.loop import TrainConfig, train


@dataclass
class PairsDataConfig:
    pairs: str = "eng-fra"  # shipped pairs name or a TSV file: source<TAB>target[<TAB>...]
    on_error: str = "stop"  # malformed lines: stop (with the line number) | skip (and count)
    tokenizer: str = "char"  # char | bpe
    vocab_size: int = 1000  # bpe only (per tokenizer)
    shared_vocab: bool = True  # one tokenizer for both sides; False = one per side
    val_fraction: float = 0.1  # held-out share of the distinct source sentences
    split_seed: int = 0
    eval_batch_size: int = 128


@dataclass
class DecodeConfig:
    beam_size: int = 4  # 1 = greedy
    length_penalty: float = 0.6  # GNMT alpha; 0 = raw log-probability
    max_len: int = 0  # longest output in tokens; 0 = the model's block_size
    samples: int = 10  # held-out translations to print and keep in translation.json


@dataclass
class Seq2SeqConfig:
    out: str = "runs/seq2seq"
    init: str = ""  # continue from this seq2seq run's weights and tokenizers
    family: str = "transformer"  # transformer | rnn: which of the model tables is used
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    rnn: RNNConfig = field(default_factory=RNNConfig)
    data: PairsDataConfig = field(default_factory=PairsDataConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.family not in SEQ2SEQ_FAMILIES:
            raise ValueError(f"family={self.family!r} is not one of "
                             f"{', '.join(SEQ2SEQ_FAMILIES)}")

    @property
    def model(self) -> TransformerConfig | RNNConfig:
        return self.transformer if self.family == "transformer" else self.rnn


def build_model(cfg: Seq2SeqConfig):
    if cfg.family == "transformer":
        return Transformer(cfg.transformer)
    return RNNEncoderDecoder(cfg.rnn)


def _tokenizers(cfg: Seq2SeqConfig, run_dir: Path, train_pairs: list[Pair], resume: bool):
    if resume or cfg.init:
        _, src_tok, tgt_tok = load_seq2seq(run_dir if resume else cfg.init)
        return src_tok, tgt_tok
    d = cfg.data
    sources = "\n".join(p.src for p in train_pairs)
    targets = "\n".join(p.tgt for p in train_pairs)
    if d.shared_vocab:
        tok = train_tokenizer(sources + "\n" + targets, d.tokenizer, d.vocab_size)
        return tok, tok
    return (train_tokenizer(sources, d.tokenizer, d.vocab_size),
            train_tokenizer(targets, d.tokenizer, d.vocab_size))


def encode_pairs(pairs: list[Pair], src_tok: Tokenizer, tgt_tok: Tokenizer,
                 block_size: int) -> tuple[PairData, int]:
    """Encoded pairs, and how many were dropped for being longer than block_size tokens."""
    src, tgt = [], []
    for p in pairs:
        s, t = encode_source(src_tok, p.src), encode_target(tgt_tok, p.tgt)
        if len(s) <= block_size and len(t) - 1 <= block_size:
            src.append(s)
            tgt.append(t)
    return PairData(src, tgt, src_tok.pad_id), len(pairs) - len(src)


def val_loss(model, data: PairData, batch_size: int) -> float:
    """Teacher-forced cross-entropy per target token over the held-out pairs."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in data.batches(batch_size):
        src, tgt_in, tgt_out = (t.to(device) for t in batch)
        n = int((tgt_out != -100).sum())
        total += model(src, tgt_in, tgt_out).item() * n
        count += n
    return total / max(count, 1)


def evaluate_translations(model, src_tok: Tokenizer, tgt_tok: Tokenizer, held: list[Pair],
                          cfg: DecodeConfig, batch_size: int) -> dict[str, Any]:
    """BLEU / chrF / exact match of greedy and beam translations of the held-out sources."""
    sources, refs = references(held)
    out: dict[str, Any] = {"sources": len(sources), "beam_size": cfg.beam_size,
                           "length_penalty": cfg.length_penalty}
    beams = [(1, "greedy")] + ([(cfg.beam_size, "beam")] if cfg.beam_size > 1 else [])
    for k, name in beams:
        t0 = time.perf_counter()
        hyps = translate(model, src_tok, tgt_tok, sources, k, cfg.length_penalty, cfg.max_len,
                         batch_size)
        out[name] = score(hyps, refs) | {"exact": round(exact_match(hyps, refs), 4),
                                         "seconds": round(time.perf_counter() - t0, 2)}
        out["samples"] = [{"src": s, "hyp": h, "refs": r}
                          for s, h, r in list(zip(sources, hyps, refs))[: cfg.samples]]
    out["best"] = out[beams[-1][1]]
    return out


def run(cfg: Seq2SeqConfig, resume: bool = False) -> dict[str, Any]:
    """Train an encoder-decoder on sentence pairs, then score it on the held-out split."""
    run_dir = prepare_run_dir(cfg.out, resume)
    pairs_file = read_pairs(cfg.data.pairs, cfg.data.on_error)
    if pairs_file.skipped:
        print(f"skipped {len(pairs_file.skipped)} malformed lines; first: "
            f"{pairs_file.skipped[0]}")
    train_pairs, held = split_pairs(pairs_file.pairs, cfg.data.val_fraction, cfg.data.split_seed)
    src_tok, tgt_tok = _tokenizers(cfg, run_dir, train_pairs, resume)

    mcfg = cfg.model
    if cfg.init:
        model = load_model(Path(cfg.init), family=cfg.family)
        mcfg = model.config
        setattr(cfg, cfg.family, mcfg)
    else:
        if mcfg.vocab_size == 0:
            mcfg.vocab_size = src_tok.vocab_size
            mcfg.tgt_vocab_size = 0 if tgt_tok is src_tok else tgt_tok.vocab_size
        if mcfg.vocab_size < src_tok.vocab_size or mcfg.target_vocab < tgt_tok.vocab_size:
            raise UserError(f"{cfg.family}.vocab_size is smaller than the tokenizer's "
                            f"{src_tok.vocab_size}; leave it at 0")
        mcfg.pad_id = src_tok.pad_id
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)

    data, dropped = encode_pairs(train_pairs, src_tok, tgt_tok, mcfg.block_size)
    held_data, _ = encode_pairs(held, src_tok, tgt_tok, mcfg.block_size)
    if not len(data):
        raise UserError(f"no training pairs fit {cfg.family}.block_size={mcfg.block_size}; "
                        "raise it or give more pairs")
    if dropped:
        print(f"dropped {dropped} training pairs longer than {cfg.family}.block_size="
            f"{mcfg.block_size} tokens")
    print(f"{cfg.family}: {model.num_params() / 1e6:.2f}M parameters, {len(data)} training pairs, "
        f"{len(held)} held-out pairs ({len(references(held)[0])} distinct sources)")

    if not resume:
        configlib.save(cfg, run_dir / "config.toml")
        save_tokenizers(run_dir, src_tok, tgt_tok)

    def batch_fn(step: int, k: int):
        return data.batch(cfg.train.batch_size, batch_generator(cfg.train.seed, step, k))

    def eval_fn(m) -> dict[str, float]:
        return {"val_loss": val_loss(m, held_data, cfg.data.eval_batch_size)} if held else {}

    result = train(model, objectives.seq2seq, batch_fn, cfg.train, run_dir, eval_fn,
                   resume=resume)
    viz.plot_metrics(run_dir)
    if held:
        model.eval()
        scores = evaluate_translations(model, src_tok, tgt_tok, held, cfg.decode,
                                       cfg.data.eval_batch_size)
        scores |= {"family": cfg.family, "params": model.num_params(),
                   "train_minutes": round(result["train_time"] / 60, 2),
                   "val_loss": result.get("val_loss")}
        if cfg.family == "rnn":
            scores["attention"] = cfg.rnn.attention
        atomic_write_text(run_dir / "translation.json", json.dumps(scores, indent=2))
        for s in scores["samples"]:
            print(f"  {s['src']!r} -> {s['hyp']!r}   (reference: {s['refs'][0]!r})")
        for name in ("greedy", "beam"):
            if name in scores:
                m = scores[name]
                print(f"held-out {name}: BLEU {m['bleu']:.1f}  chrF {m['chrf']:.1f}  "
                    f"exact {m['exact']:.1%}")
        result |= {"bleu": scores["best"]["bleu"], "chrf": scores["best"]["chrf"]}
    return result
