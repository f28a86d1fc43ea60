"""Attention maps: where each token looks, per layer and head, drawn as heatmaps.

    tinylm attention --run runs/shakespeare-char "ROMEO: But soft" --png attn.png
    tinylm attention --run runs/seq2seq-transformer "I am cold." --png cross.png

- GPT and BERT runs: self-attention over the prompt's tokens, one panel per layer and head
  (GPT's is causal, so each map is lower-triangular; BERT's sees both ways).
- Transformer translation runs: the sentence is translated first, then the decoder's
  cross-attention is read off a teacher-forced pass over the translation: one panel per
  decoder layer and head, generated target tokens down, source tokens across.
- RNN runs with attention: the one map of additive attention weights (target x source).
  An RNN without attention has no map to draw: its decoder only sees the context vector.

Every row of every map is a softmax, so it sums to 1 over the keys a query may see.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tinylm.errors import UserError
from tinylm.rundir import load_model, load_seq2seq, read_model_meta
from tinylm.tokenizer import MASK, Tokenizer

SELF_FAMILIES = ("gpt", "bert")
CROSS_FAMILIES = ("transformer", "rnn")


@dataclass
class AttentionMaps:
    """weights (L, H, T, S): layer, head, query token, key token; rows sum to 1."""

    kind: str  # "self" or "cross"
    family: str
    weights: torch.Tensor
    queries: list[str]  # T labels (prompt tokens, or generated target tokens)
    keys: list[str]  # S labels (prompt tokens, or source tokens)
    text: str = ""  # the prompt or source sentence
    translation: str = ""


def _labels(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.decode([i]) or tok.id_to_token(i) for i in ids]


@torch.no_grad()
def self_attention(model, tok: Tokenizer, text: str) -> AttentionMaps:
    """Self-attention of every layer and head of a GPT or BERT over `text`."""
    family = model.family
    if family == "bert":
        text = text.replace("[MASK]", MASK)  # let a fill-mask prompt be pictured as written
    ids = tok.encode(text)
    if not ids:
        raise UserError("the text is empty; give a prompt to look at")
    limit = model.config.block_size
    if len(ids) > limit:
        raise UserError(f"the text is {len(ids)} tokens, over the model's block_size={limit}; "
                        "shorten it")
    attns = [block.attn for block in model.blocks]
    for a in attns:
        a.keep_weights = True
    try:
        model(torch.tensor([ids], device=next(model.parameters()).device))
        weights = torch.cat([a.weights for a in attns])  # (L, H, T, T)
    finally:
        for a in attns:
            a.keep_weights, a.weights = False, None
    labels = _labels(tok, ids)
    return AttentionMaps("self", family, weights.float().cpu(), labels, labels, text)


@torch.no_grad()
def cross_attention(model, src_tok: Tokenizer, tgt_tok: Tokenizer, text: str,
                    beam_size: int = 1, alpha: float = 0.6) -> AttentionMaps:
    """Translate `text`, then the decoder's attention over the source for that translation."""
    from tinylm.data.pairs import encode_source
    from tinylm.infer.beam import decode

    if model.family == "rnn" and not model.config.attention:
        raise UserError("this RNN has no attention: its decoder sees only the fixed context "
                        "vector; train one with rnn.attention=true (preset seq2seq-rnn-attn)")
    device = next(model.parameters()).device
    src_ids = encode_source(src_tok, text)
    src = torch.tensor([src_ids], device=device)
    if model.family == "transformer" and src.shape[1] > model.config.block_size:
        raise UserError(f"the text is {src.shape[1]} tokens, over the model's block_size="
                        f"{model.config.block_size}; shorten it")
    hyp = decode(model, src, tgt_tok.bos_id, tgt_tok.eos_id, model.config.block_size,
                 beam_size, alpha)[0]
    tgt_in = torch.tensor([[tgt_tok.bos_id] + hyp[: model.config.block_size - 1]],
                          device=device)
    if model.family == "transformer":
        attns = [block.cross for block in model.decoder.blocks]
        for a in attns:
            a.keep_weights = True
        try:
            model(src, tgt_in)
            weights = torch.cat([a.weights for a in attns])  # (L, H, T, S)
        finally:
            for a in attns:
                a.keep_weights, a.weights = False, None
    else:
        model.decoder.keep_weights, model.decoder.weights = True, []
        try:
            model(src, tgt_in)
            weights = torch.stack(model.decoder.weights, dim=1)[None]  # (1, 1, T, S)
        finally:
            model.decoder.keep_weights, model.decoder.weights = False, []
    outputs = (hyp + [tgt_tok.eos_id])[: tgt_in.shape[1]]  # what each query position wrote
    return AttentionMaps("cross", model.family, weights.float().cpu(),
                         _labels(tgt_tok, outputs), _labels(src_tok, src_ids), text,
                         tgt_tok.decode(hyp, skip_special=True))


def attention_maps(run_dir: str | Path, text: str, beam_size: int = 1) -> AttentionMaps:
    """The maps for any run: self-attention for GPT/BERT, cross-attention for translators."""
    family = read_model_meta(Path(run_dir))["family"]
    if family in SELF_FAMILIES:
        model = load_model(Path(run_dir), family=family).eval()
        return self_attention(model, Tokenizer.load(Path(run_dir) / "tokenizer.json"), text)
    if family in CROSS_FAMILIES:
        model, src_tok, tgt_tok = load_seq2seq(run_dir)
        return cross_attention(model, src_tok, tgt_tok, text, beam_size)
    raise UserError(f"{run_dir} holds a {family} model; attention maps need a gpt, bert, "
                    "transformer or rnn run")


def plot_attention(maps: AttentionMaps, out: Path, title: str = "") -> Path:
    """A grid of heatmaps: one row per layer, one column per head."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    L, H, T, S = maps.weights.shape
    cell = max(1.6, min(4.0, 0.22 * max(T, S) + 0.8))
    width = max(cell * H + 0.6, 5.0)  # room for the title above a single panel
    fig, axes = plt.subplots(L, H, figsize=(width, cell * L + 0.9), squeeze=False)
    show = [repr(t)[1:-1] for t in maps.keys], [repr(t)[1:-1] for t in maps.queries]
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            ax.imshow(maps.weights[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0,
                      aspect="auto", interpolation="nearest")
            ax.set_title(f"layer {layer + 1}, head {head + 1}" if H > 1 or L > 1 else
                         "attention", fontsize=8)
            small = max(T, S) <= 40
            ax.set_xticks(range(S) if small else [])
            ax.set_yticks(range(T) if small else [])
            if small:
                ax.set_xticklabels(show[0], fontsize=6, rotation=90)
                ax.set_yticklabels(show[1], fontsize=6)
    axis = ("source" if maps.kind == "cross" else "key") + " tokens ->"
    fig.supxlabel(axis, fontsize=9)
    fig.supylabel("generated tokens ->" if maps.kind == "cross" else "query tokens ->",
                  fontsize=9)
    if not title:
        title = f"{maps.family} {maps.kind}-attention"
        if maps.kind == "cross":
            title += f": {maps.text!r} -> {maps.translation!r}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
